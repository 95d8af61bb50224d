-- Runs once, when the compose PostgreSQL starts on an empty volume.
CREATE ROLE tributary LOGIN REPLICATION PASSWORD 'tributary';
CREATE TABLE public.orders (id int PRIMARY KEY, item text NOT NULL, qty int NOT NULL);
GRANT SELECT ON ALL TABLES IN SCHEMA public TO tributary;
GRANT CREATE ON DATABASE shop TO tributary;
ALTER TABLE public.orders OWNER TO tributary;
