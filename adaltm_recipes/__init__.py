"""Recipes: end-to-end workflows assembled from the libraries and the launcher (the offline demo and its corpus).
Nothing in the libraries imports them."""
