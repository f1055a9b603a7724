"""Reference Flower apps that exercise flwr-guard on real data."""
