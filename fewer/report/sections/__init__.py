"""Tour sections. Each module here defines ``ORDER`` (int), ``TITLE`` (str) and ``run(ctx)``;
the tour runs them in ORDER. A method adds its part to the tour by adding a module."""
