"""tfds dataset builders that the tfds catalog lacks."""
