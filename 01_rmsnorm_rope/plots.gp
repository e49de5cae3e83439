# Plots of the 01_rmsnorm_rope demo. Run: gnuplot -e "outdir='out/01_rmsnorm_rope'" 01_rmsnorm_rope/plots.gp
if (!exists("outdir")) outdir = "out/01_rmsnorm_rope"
set terminal pngcairo size 800,500 font ",11"
set datafile separator ","
set key autotitle columnhead top left
set grid

set output outdir."/wavelength.png"
set title "RoPE wavelength per pair (Dr = 64, theta = 1e4): plain vs YaRN (factor 40, original context 4096)"
set xlabel "pair index i"
set ylabel "wavelength 2*pi/f_i (tokens)"
set logscale y
stats outdir."/wavelength.csv" using 5 nooutput
low = STATS_max
stats outdir."/wavelength.csv" using 6 nooutput
high = STATS_max
set key top left Left reverse
set yrange [1:1e9]  # room for the key above the curves
set arrow 1 from low, graph 0 to low, graph 1 nohead dt 2 lc "gray40"
set arrow 2 from high, graph 0 to high, graph 1 nohead dt 4 lc "gray40"
# The two vertical lines are YaRN's correction range [low, high] (DeepSeek's find_correction_range with
# beta_fast = 32, beta_slow = 1); arrows have no key entry, so two empty series carry their titles.
plot outdir."/wavelength.csv" using 1:2 with linespoints title "plain RoPE", \
     "" using 1:3 with linespoints title "YaRN", \
     "" using 1:4 with lines dt 3 lc "black" title "original context (4096)", \
     NaN with lines dt 2 lc "gray40" title sprintf("low = %d: pairs <= low keep their f (beta_fast: >= 32 turns in 4096)", low) noenhanced, \
     NaN with lines dt 4 lc "gray40" title sprintf("high = %d: pairs >= high get f / 40 (beta_slow: < 1 turn in 4096)", high) noenhanced
unset arrow 1
unset arrow 2
unset logscale y
set yrange [*:*]
set key noreverse Right

set output outdir."/score_vs_distance.png"
set title "<R_m q, R_n k> for q = k = 1, normalised, as |m - n| grows (V3: YaRN to 163,840 tokens)"
set xlabel "relative distance |m - n| (tokens)"
set ylabel "score / score at 0"
set logscale x
set key top right
# Thick: the mean over the distances d/2 .. 3d/2 (triangular weights, peak at d); thin: the score at each distance.
plot outdir."/score_vs_distance.csv" using ($1+1):2 with lines lw 0.5 lc "#d8b0f0" notitle, \
     "" using ($1+1):3 with lines lw 0.5 lc "#a8e0c8" notitle, \
     "" using ($1+1):4 with lines lw 2.5 lc 1 title "plain RoPE (mean over distances d/2 .. 3d/2)", \
     "" using ($1+1):5 with lines lw 2.5 lc 2 title "YaRN, factor 40 (same mean)", \
     NaN with lines lw 0.5 lc "gray70" title "at each single distance (thin)"
unset logscale x

set output outdir."/rms.png"
set title "RMS of each token before and after RMSNorm (weight = 1)"
set xlabel "token"
set ylabel "RMS"
set logscale y
set key top right
plot outdir."/rms.csv" using 1:2 with points pt 7 title "before", \
     "" using 1:3 with points pt 5 title "after"
