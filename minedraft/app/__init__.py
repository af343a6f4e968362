"""What users run on top of the services: the launcher, demo, client, certificates and benchmarks."""
