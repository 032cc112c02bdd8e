"""Real execution of schedules with torch (installed as ``partime_sim.backends``)."""
