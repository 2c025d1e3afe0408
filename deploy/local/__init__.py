"""`make stack`: PostgreSQL, SeaweedFS (S3), an MLflow tracking server and Airflow's four components as real local
processes, all state under one folder. `stack.py` is the command line (up, down, status); the other modules each
start one kind of service or prepare what the DAG needs."""
