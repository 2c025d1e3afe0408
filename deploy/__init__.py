"""Ways to run Dreamline's services: `deploy/local/` runs the whole production shape as local processes."""
