"""The data library of the `prepare` stage: read the labelled source and the unlabelled pool, normalise,
deduplicate, split, and write the prepared splits."""
