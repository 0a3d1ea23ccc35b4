"""Client-level differential privacy (DP-FedAvg): job spec, accountant, noised aggregation, budget gate."""
