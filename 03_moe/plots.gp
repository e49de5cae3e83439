# Plots of the 03_moe demo. Run: gnuplot -e "outdir='out/03_moe'" 03_moe/plots.gp
if (!exists("outdir")) outdir = "out/03_moe"
set terminal pngcairo size 800,500 font ",11"
set datafile separator ","
set key autotitle columnhead top right
set grid

set output outdir."/load.png"
set multiplot layout 1,2 title "One batch through the router (E = 64, K = 8, 8 groups keep 4, random weights)"
set title "tokens per expert"
set xlabel "expert"
set xrange [-1:64]
set ylabel "tokens"
set yrange [0:*]
set style fill solid 0.6
set boxwidth 0.8
plot outdir."/load.csv" using 1:2 with boxes title "tokens", "" using 1:4 with lines lw 2 dt 2 title "uniform (N K / E)"
set title "how often each group is kept"
set xrange [-0.6:7.6]
set xlabel "group"
set ylabel "fraction of tokens"
set yrange [0:1]
plot outdir."/groups.csv" using 1:2 with boxes title "kept", "" using 1:3 with lines lw 2 dt 2 title "uniform (Lg / G)"
unset multiplot
set xrange [*:*]
set yrange [*:*]

set style fill solid 1.0
set output outdir."/routing_heatmap.png"
set title "Routing weights of the first 48 tokens (white = not chosen; each row sums to route\\_scale = 2.5)"
set xlabel "expert"
set ylabel "token"
set cblabel "weight"
set palette defined (0 "white", 0.01 "#ffffcc", 0.5 "#fd8d3c", 1 "#800026")
set xrange [-0.5:63.5]
set yrange [-0.5:47.5]
plot outdir."/routing_heatmap.csv" using 2:1:3 with image notitle
set xrange [*:*]
set yrange [*:*]

set output outdir."/bias_sweep.png"
set title "Raising the selection bias of expert 0: its load follows, no gradient or weight involved"
set xlabel "bias of expert 0"
set ylabel "tokens routed"
set key top left
plot outdir."/bias_sweep.csv" using 1:2 with linespoints title "expert 0", \
     "" using 1:4 with linespoints title "busiest other expert", \
     "" using 1:3 with lines dt 2 lw 2 title "uniform load"

set output outdir."/time_per_layer.png"
set title "One MoE layer, forward + backward (D 128, F 64, E 64, K 8)"
set xlabel "tokens"
set ylabel "ms"
set logscale xy
# Without a GPU the gpu_ms column holds "nan": count the rows with a number; the GPU line is drawn only then.
stats outdir."/time_per_layer.csv" every ::1 using (strcol(3) eq "nan" ? 0 : 1) name "GPU" nooutput
gpu = GPU_sum > 0 ? 1 : 0
plot outdir."/time_per_layer.csv" using 1:2 with linespoints lc 1 title "CPU (Eigen)", \
     for [g=1:gpu] outdir."/time_per_layer.csv" using 1:3 with linespoints lc 2 title "GPU (CUDA + cuBLAS)"
