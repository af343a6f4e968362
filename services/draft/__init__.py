"""The draft service: proposes k tokens per sequence with the small model."""
