"""partime-sim: predict and measure pipeline-parallel training/inference on streamed data."""

from partime_sim.errors import ConfigError, PartimeError, PartitionError, ScheduleError

__all__ = ["ConfigError", "PartimeError", "PartitionError", "ScheduleError"]
__version__ = "0.1.0"
