"""Staged searches declared in a file: the plan file (:mod:`.spec`), running it
on this machine (:mod:`.runner`) and its status table (:mod:`.status`)."""
