# Plots of the 02_mla demo. Run: gnuplot -e "outdir='out/02_mla'" 02_mla/plots.gp
if (!exists("outdir")) outdir = "out/02_mla"
set terminal pngcairo size 900,760 font ",10"
set datafile separator ","
set grid

# ---- attention maps: four heads, random init, byte tokens ----
set output outdir."/attention_maps.png"
set multiplot layout 2,2 title "Causal attention of heads 0-3, random init, \"the quick brown fox jumps over the lazy dog\" (bytes)"
unset grid
set xlabel "key position s"
set ylabel "query position t"
set size ratio -1
set palette rgb 33,13,10
set cbrange [0:0.3]  # clipped: row 0 is a single 1.0; uniform causal attention would be 1/(t+1)
set cblabel "p (clipped at 0.3)"
set yrange [*:*] reverse
do for [h=0:3] {
  set title sprintf("head %d", h)
  plot outdir.sprintf("/attention_h%d.csv", h) matrix with image notitle
}
unset multiplot
set xrange [*:*]
set yrange [*:*] noreverse
set size noratio
unset cblabel
set grid

# ---- KV cache size vs context ----
set terminal pngcairo size 1000,450 font ",10"
set output outdir."/kv_cache.png"
set key autotitle columnhead top left
set logscale xy
set format x "%.0s%c"
set format y "10^{%L}"
set xlabel "context length (tokens)"
set ylabel "KV cache of one sequence, bf16 (GiB)"
set multiplot layout 1,2
set title "DeepSeek-V3: 61 layers, H=128, Dn=128, Dr=64, Dv=128, Dc=512"
plot outdir."/kv_cache.csv" using 1:2 with linespoints title "MHA", \
     "" using 1:3 with linespoints title "GQA, 8 groups", \
     "" using 1:4 with linespoints title "MQA", \
     "" using 1:5 with linespoints lw 2 title "MLA (Dc + Dr = 576)"
set title "\"small\", one layer: H=8, Dn=64, Dr=32, Dv=64, Dc=128"
plot outdir."/kv_cache.csv" using 1:6 with linespoints title "MHA", \
     "" using 1:7 with linespoints title "GQA, 2 groups", \
     "" using 1:8 with linespoints title "MQA", \
     "" using 1:9 with linespoints lw 2 title "MLA (Dc + Dr = 160)"
unset multiplot
unset logscale xy
set format x "%g"
set format y "%g"

# ---- rope vs nope share of the score per head ----
set terminal pngcairo size 800,450 font ",11"
set output outdir."/rope_share.png"
set title "Share of |score| from the rope part (q_pe.k_pe) vs the nope part (q_nope.k_nope), random init" noenhanced
set xlabel "head"
set ylabel "share of mean |score part|"
set yrange [0:1]
set style data histograms
set style histogram rowstacked
set style fill solid 0.8 border -1
set boxwidth 0.7
set key outside right top
plot outdir."/rope_share.csv" using 3:xtic(1) title "nope", "" using 2 title "rope"
set yrange [*:*]
set style data points
set key inside

# ---- decode time per token ----
set output outdir."/decode_time.png"
set title "Time per decoded token, \"small\" preset, B=1: naive (expand K, V from the latent) vs absorbed"
set xlabel "context length (tokens)"
set ylabel "ms per token"
set logscale xy
set key top left
# Without a GPU the GPU columns hold "nan": count the rows with a number; the GPU lines are drawn only then.
stats outdir."/decode_time.csv" every ::1 using (strcol(4) eq "nan" ? 0 : 1) name "GPU" nooutput
gpu = GPU_sum > 0 ? 1 : 0
plot outdir."/decode_time.csv" using 1:2 with linespoints lc 1 title "CPU naive", \
     "" using 1:3 with linespoints lc 2 title "CPU absorbed", \
     for [g=1:gpu] outdir."/decode_time.csv" using 1:4 with linespoints lc 3 title "GPU naive", \
     for [g=1:gpu] outdir."/decode_time.csv" using 1:5 with linespoints lc 4 title "GPU absorbed"

# ---- attention of the training form: materialised vs fused (written only with a GPU) ----
if (system("test -f ".outdir."/attention_time.csv && echo 1") eq "1") {
  set terminal pngcairo size 1000,450 font ",10"
  set output outdir."/attention_time.png"
  set multiplot layout 1,2 title "Training-form attention, \"small\" heads (H=8, S=96, Dv=64), B*T = 16384, bf16"
  set title "forward + backward time"
  set xlabel "sequence length T"
  set ylabel "ms"
  set logscale xy
  set xrange [100:3000]
  set key top left
  # PyTorch's SDPA on cuDNN at the same shapes, when 02_mla/torch_sdpa_bench.py --csv wrote it beside ours
  sdpa_file = outdir."/torch_sdpa.csv"
  has_sdpa = system("test -f ".sdpa_file." && echo 1") eq "1"
  sdpa = "< awk -F, '$2 == \"cudnn\"' ".sdpa_file  # its cuDNN rows only
  plot outdir."/attention_time.csv" using 1:($3+$4) with linespoints lw 2 title "materialised (version 1)", \
       "" using 1:($5+$6) with linespoints lw 2 title "fused (ours)", \
       for [i=1:has_sdpa] sdpa using 1:($3+$4) with linespoints lw 2 dt 2 \
         title "PyTorch SDPA, cuDNN (no packing pass)"
  set title "useful (causal) TFLOP/s"
  set ylabel "TFLOP/s"
  unset logscale y
  set logscale x
  set yrange [0:*]
  plot outdir."/attention_time.csv" using 1:7 with linespoints lw 2 title "materialised (version 1)", \
       "" using 1:8 with linespoints lw 2 title "fused (ours)", \
       for [i=1:has_sdpa] sdpa using 1:5 with linespoints lw 2 dt 2 \
         title "PyTorch SDPA, cuDNN (no packing pass)"
  unset multiplot
  unset logscale xy
  set xrange [*:*]
  set yrange [*:*]
}
