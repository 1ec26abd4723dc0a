"""DiT configs (Peebles & Xie 2023, arXiv:2212.09748): the diffusion transformer in pixel space."""
