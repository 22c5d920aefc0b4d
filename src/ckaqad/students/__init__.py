"""Students: `spec` (the kinds a student can be made from: ptq, load), `store` (student directories)."""
