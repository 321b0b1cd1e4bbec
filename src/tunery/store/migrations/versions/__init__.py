"""Named schema revisions, appended only."""
