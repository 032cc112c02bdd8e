"""Predicted-vs-measured analysis and plots (installed as ``partime_sim.analysis``)."""
