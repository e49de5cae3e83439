# Plots of the 06_full_model demo. Run: gnuplot -e "outdir='out/06_full_model'" 06_full_model/plots.gp
if (!exists("outdir")) outdir = "out/06_full_model"
set terminal pngcairo size 1100,700 font ",10" noenhanced
set datafile separator ","
set output outdir."/params.png"
set multiplot layout 2,2 title "parameters per component: total (all experts) vs active per token"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set logscale y
set grid ytics
set xtics rotate by 35 right scale 0
set key outside right top vertical  # beside each panel, clear of the bars
set ylabel "parameters"
set yrange [10:*]
do for [cfg in "tiny lyrics small deepseek-v3"] {
  set title cfg
  plot outdir."/params_".cfg.".csv" using 2:xtic(1) title "total", "" using 3 title "active"
}
unset multiplot

set output outdir."/init_rms.png"
set terminal pngcairo size 800,450 font ",11" noenhanced
unset multiplot
unset style
set style data linespoints
set title "small preset at initialisation: RMS per layer (layer 0 dense, 1-7 MoE)"
set xlabel "layer"
set ylabel "RMS"
set logscale y
set yrange [*:*]
set xtics norotate autofreq 1
set key inside top left
plot outdir."/init_rms.csv" using 1:2 with linespoints pt 7 title "activation (residual stream after the layer)", \
     "" using 1:3 with linespoints pt 5 title "parameter gradient"
