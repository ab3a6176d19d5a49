"""`scalelab pipeline run`: the whole path of one model, with skipping and partial reruns."""
