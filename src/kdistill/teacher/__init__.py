"""Everything about teachers: the roster of live and cached teachers, their forward pass, vocabulary
matching, teacher-written responses, the cache format and `kdistill cache`."""
