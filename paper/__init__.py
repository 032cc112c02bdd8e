"""Reproductions of the PARTIME and LayerPipe papers' experiments (``partime-sim paper``)."""
