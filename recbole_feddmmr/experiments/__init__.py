"""Experiments: everything that runs many trainings and writes results (benchmark, federated benchmark, study,
scale, Ray Tune search, report). The core package never imports this one."""
