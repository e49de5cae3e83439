# Plots of the 05_mtp demo. Run: gnuplot -e "outdir='out/05_mtp'" 05_mtp/plots.gp
# The demo writes meta.gp (depth = number of MTP modules) next to train.csv, whose columns are
#   step, main, mtp1..mtpD, eval_main, eval_mtp1..eval_mtpD, acceptance, main_acc, mtp1_acc, ce_floor, acc_ceiling
if (!exists("outdir")) outdir = "out/05_mtp"
depth = 2
load outdir."/meta.gp"
set terminal pngcairo size 800,500 font ",11" noenhanced
set datafile separator ","
set datafile missing "nan"
set grid
f = outdir."/train.csv"
c_eval = 3 + depth
c_acc = 4 + 2 * depth

set output outdir."/loss_per_depth.png"
set title "cross-entropy per depth: training (lines), held-out (points); nats/token"
set xlabel "step"
set ylabel "cross-entropy"
set logscale y
set key top right
plot f using 1:2 smooth bezier with lines lw 2 lc 1 title "main: t(i+1)", \
     for [k=1:depth] f using 1:(column(2 + k)) smooth bezier with lines lw 2 lc (k + 1) title sprintf("mtp %d: t(i+%d)", k, k + 1), \
     for [k=0:depth] f using 1:(column(c_eval + k)) with points pt 7 ps 0.8 lc (k + 1) notitle, \
     f using 1:(column(c_acc + 3)) with lines dt 2 lw 1 lc rgb "black" title "best possible (every depth)"
unset logscale y

set output outdir."/acceptance.png"
set title "held-out: module 1's top-1 at i vs the main model's top-1 at i+1 (both predict t(i+2))"
set ylabel "fraction of positions"
set yrange [0:1]
set key bottom right
plot f using 1:(column(c_acc)) with linespoints pt 7 ps 0.8 lw 2 lc 1 title "acceptance (draft == main)", \
     f using 1:(column(c_acc + 1)) with linespoints pt 5 ps 0.6 lw 1 lc 2 title "main top-1 accuracy", \
     f using 1:(column(c_acc + 2)) with linespoints pt 9 ps 0.6 lw 1 lc 3 title "module 1 top-1 accuracy", \
     f using 1:(column(c_acc + 4)) with lines dt 2 lw 1 lc rgb "black" title "best possible accuracy"
