"""Clusters: endpoints, load balancing, pooled upstream connections."""
