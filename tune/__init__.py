"""Ray Tune sweeps over tbps training runs (issue #5)."""
