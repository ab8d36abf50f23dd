"""Input checks and honest decisions: quality gate, OOD score, decision and flags, prevalence adaptation."""
