"""The stages a recipe runs around the clustering itself: prune, calibrate,
allocate bits, GPTQ, train/distil. ``wclust.recipes.pipeline`` runs them in order."""
