-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d/):
-- one Postgres instance, one database each for the MLflow and Prefect servers of
-- infra/compose.yaml, owned by POSTGRES_USER.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
