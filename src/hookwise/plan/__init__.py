"""The planner: measure, predict, choose, apply, verify."""
