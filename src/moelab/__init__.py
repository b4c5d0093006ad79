"""moelab: routing in Mixture-of-Experts."""

__version__ = "0.1.0"
