"""Benchmark app: plain FedAvg vs flwr-guard SecAgg+ vs Flower's SecAgg+ (legacy path)."""
