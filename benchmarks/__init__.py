"""regserve benchmarks: regserve against the reference registry (CNCF distribution), same client,
same run, alternating A/B/B/A. Run with `make bench` or `python -m benchmarks`."""
