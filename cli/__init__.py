"""The strata command line."""
