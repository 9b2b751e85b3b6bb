"""One module per tier; each has ``cases(target, sweep) -> list[Case]``."""
