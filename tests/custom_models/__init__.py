"""Model code for the registry tests, which registration ships as custom code."""
