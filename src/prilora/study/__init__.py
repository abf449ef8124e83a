"""Study machinery over ``prilora train`` runs: ``sweep`` runs the grids a spec describes (resumable,
results appended as JSON lines), ``report`` turns results lines into tables, tests and plots. It works
on any task's results; it uses the GLUE package only to start and read its runs."""
