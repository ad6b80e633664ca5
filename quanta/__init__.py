"""quanta: run AI models cheaply and serve them at scale."""
