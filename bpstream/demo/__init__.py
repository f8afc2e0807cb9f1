"""The one-command demo and the pipeline benchmark: the whole system on the local servers."""
