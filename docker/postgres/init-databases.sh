#!/bin/sh
# Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), and by
# tests/test_servers.py against a native PostgreSQL. Each service gets its own role and database, so
# a sweep worker holding the Optuna password cannot read or change the MLflow tables:
#   mlflow       MLflow tracking backend   (role mlflow, password $MLFLOW_DB_PASSWORD)
#   mlflow_auth  MLflow basic-auth users   (role mlflow)
#   optuna       Optuna studies            (role optuna, password $OPTUNA_DB_PASSWORD)
set -eu
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD}"

psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
     -v mlflow_pw="$MLFLOW_DB_PASSWORD" -v optuna_pw="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE ROLE optuna LOGIN PASSWORD :'optuna_pw';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
SQL
