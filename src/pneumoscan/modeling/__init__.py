"""Networks and their weights, transforms, and the self-describing model.pt."""
