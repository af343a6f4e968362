"""The target service: verifies drafts with the large model, losslessly."""
