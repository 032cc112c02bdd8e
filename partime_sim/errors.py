"""One small exception hierarchy: every bad input raises one of these with a message that
names the bad value and proposes the fix (the CLI prints it on one line, exit status 2)."""


class PartimeError(Exception):
    """Base of every error partime-sim raises on purpose."""


class ConfigError(PartimeError, ValueError):
    """A bad user setting: unknown network/schedule/preset, negative cost, malformed JSON..."""


class PartitionError(PartimeError, ValueError):
    """A partition that does not fit the network (sizes, stage count, device map)."""


class ScheduleError(PartimeError):
    """A schedule that fails validation (cycle, missing/duplicate task, deadlock...)."""
