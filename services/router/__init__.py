"""The router: the public streaming API and the lanes that keep both devices busy."""
