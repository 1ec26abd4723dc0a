"""Evaluation at the papers' protocols: Inception features (FID / IS / KID / precision-recall),
reference statistics, large sample sets and the metrics computed from them."""
