# Plots of the 04_aux_loss experiment. Run: gnuplot -e "outdir='out/04_aux_loss'" 04_aux_loss/plots.gp
if (!exists("outdir")) outdir = "out/04_aux_loss"
set terminal pngcairo size 800,500 font ",11" noenhanced
set datafile separator ","
set key top right
set grid
settings = "none seq_loss bias bias+loss"
file(s) = outdir."/train_".s.".csv"

set output outdir."/maxvio.png"
set multiplot layout 1,2 title "MaxVio over training (0 = perfect balance), 2 MoE layers, 16 experts, top-4"
set xlabel "step"
set ylabel "MaxVio (batch)"
set yrange [0:*]
plot for [i=1:4] file(word(settings,i)) using 1:4 smooth bezier with lines lw 2 lc i title word(settings,i)
set ylabel "MaxVio (per sequence, mean)"
plot for [i=1:4] file(word(settings,i)) using 1:5 smooth bezier with lines lw 2 lc i title word(settings,i)
unset multiplot
set yrange [*:*]

set output outdir."/loss.png"
set terminal pngcairo size 1100,500 font ",11" noenhanced
set multiplot layout 1,2 title "training loss (lines, smoothed) and validation loss (points), nats/byte"
set title "cross-entropy, from step 25"
set xlabel "step"
set ylabel "cross-entropy"
plot for [i=1:4] file(word(settings,i)) using ($1 >= 25 ? $1 : NaN):2 smooth bezier with lines lw 2 lc i title word(settings,i), \
     for [i=1:4] file(word(settings,i)) using 1:6 with points pt 7 ps 0.7 lc i notitle
# Same initial weights and batches in every setting: the difference at each step is the cost of balancing.
set title "difference to none (same batches): > 0 = balancing costs loss"
set ylabel "cross-entropy - none's"
diff = outdir."/loss_vs_none.csv"
plot 0 with lines lw 2 lc 1 title "none", \
     for [i=2:4] diff using 1:i smooth bezier with lines lw 2 lc i title word(settings,i), \
     for [i=2:4] diff using 1:(column(i + 3)) with points pt 7 ps 0.7 lc i notitle
unset multiplot

set output outdir."/load_heatmap.png"
set terminal pngcairo size 1000,700 font ",10" noenhanced
set multiplot layout 2,2 title "share of layer 0's routed slots per expert over training (1/16 = balanced)"
unset key
set xlabel "step"
set ylabel "expert"
set cbrange [0:0.3]
set xrange [0:*]
set yrange [-0.5:*]
set autoscale xfixmax
set autoscale yfixmax
set palette rgbformulae 33,13,10
do for [s in settings] {
  set title s
  plot outdir."/load_".s.".csv" using 1:2:3 with image
}
unset multiplot
