"""Readers for the other catalog kinds (fashion-mnist, imagefolder, npz) register here."""
