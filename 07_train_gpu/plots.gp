# Plots of a 07_train_gpu training run, from the CSVs the trainer writes into the run folder.
# Run: gnuplot -e "outdir='out/07_train_gpu/run'" 07_train_gpu/plots.gp
#   train.csv        step,lr,loss,ce,mtp,mtp_d1..mtp_dD,balance,grad_norm,maxvio[,maxvio_mtp],tokens_per_s,elapsed_s
#   val.csv          step,val_ce,val_bpb,val_mtp_d1..val_mtp_dD,train_ce,best
#   expert_load.csv  step,layer,expert,load    (layers L .. L+D-1: the MTP modules' blocks)
if (!exists("outdir")) outdir = "out/07_train_gpu/run"
set terminal pngcairo size 800,500 font ",11" noenhanced
set datafile separator ","
set key top right
set grid
train = outdir."/train.csv"
val = outdir."/val.csv"
load_csv = outdir."/expert_load.csv"

# From train.csv's header: D, the MTP depth (columns mtp_d1 .. mtp_dD), and whether the MTP blocks are MoE
# layers (column maxvio_mtp)
header = system("head -1 '".train."' | tr ',' ' '")
mtp_moe = strstrt(header, "maxvio_mtp") > 0
D = words(header) - 10 - mtp_moe
gn = 7 + D
mv = 8 + D

set output outdir."/loss.png"
set title "cross-entropy (nats/token): train per step (lines), validation (points)"
set xlabel "step"
set ylabel "cross-entropy"
plot train skip 1 using 1:4 with lines lw 1.5 lc 1 title "train ce", \
     val skip 1 using 1:2 with linespoints pt 7 ps 0.8 lw 2 lc 2 title "val ce", \
     for [k=1:D] train skip 1 using 1:(column(5 + k)) with lines lw 1 dt 2 lc 2 + k \
         title sprintf("train MTP depth %d", k), \
     for [k=1:D] val skip 1 using 1:(column(3 + k)) with points pt 5 ps 0.6 lc 2 + k \
         title sprintf("val MTP depth %d", k)

set output outdir."/lr.png"
set title "learning rate: linear warm-up, then cosine"
set ylabel "lr"
set format y "%.1e"
plot train skip 1 using 1:2 with lines lw 2 lc 1 notitle
set format y "% h"

set output outdir."/grad_norm.png"
set title "global gradient norm before clipping (log scale)"
set ylabel "||g||"
set logscale y
plot train skip 1 using 1:(column(gn)) with lines lw 1 lc 1 notitle
unset logscale y

set output outdir."/maxvio.png"
set title "MaxVio of the step's batch (0 = perfect balance)"
set ylabel "MaxVio"
set yrange [0:*]
plot train skip 1 using 1:(column(mv)) with lines lw 1 lc 1 title "main model, mean over MoE layers", \
     for [i=1:mtp_moe] train skip 1 using 1:(column(mv + 1)) with lines lw 1 lc 2 title "MTP module's MoE block"
set yrange [*:*]

# Heat map: one row per (MoE layer, expert), one column per evaluation step; colour = share of the layer's
# routed slots (1/E is a perfectly balanced expert).
set output outdir."/expert_load.png"
set terminal pngcairo size 1000,700 font ",10" noenhanced
stats load_csv skip 1 using 2 nooutput
L0 = int(STATS_min)
L1 = int(STATS_max)
stats load_csv skip 1 using 3 nooutput
E = int(STATS_max) + 1
stats load_csv skip 1 using 1 nooutput
rows_per_step = (L1 - L0 + 1) * E
nsteps = STATS_records / rows_per_step
dx = nsteps > 1 ? (STATS_max - STATS_min) / (nsteps - 1) : 1.0  # 1.0: gnuplot divides integers as integers
set title sprintf("share of each MoE layer's routed slots per expert (balanced: 1/%d; MTPk: module k's block)", E)
set xlabel "step"
set ylabel "layer:expert"
unset key
unset grid
set ytics ()
do for [l=L0:L1] {
  name = (mtp_moe && l > L1 - D) ? sprintf("MTP%d", l - (L1 - D)) : sprintf("%d", l)
  if (rows_per_step <= 40) { do for [e=0:E-1] { set ytics add (sprintf("%s:%d", name, e) (l - L0) * E + e) } }
  else { set ytics add (sprintf("%s:0", name) (l - L0) * E) }
  y = (l - L0) * E - 0.5
  if (l > L0) { set arrow from graph 0, first y to graph 1, first y nohead front lw 2 lc "white" }
}
set yrange [-0.5:rows_per_step - 0.5]
set xrange [STATS_min - dx / 2:STATS_max + dx / 2]
set cbrange [0:*]
set palette rgbformulae 33,13,10
plot load_csv skip 1 using 1:(($2 - L0) * E + $3):(dx / 2):(0.5):4 with boxxyerror fs solid 1.0 noborder lc palette
