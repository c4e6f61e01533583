"""Everything about teachers: one interface for live, cached and served teachers (`base.Teacher`), the
roster, vocabulary matching, teacher-written responses, the cache format and `kdistill cache`."""
