"""Figures for researchers (matplotlib, Agg backend): rank lists, distance histograms, t-SNE scatters."""
