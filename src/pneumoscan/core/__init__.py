"""Ground layer: errors, atomic files, the typed config and recipes, numeric methods. No torch."""
