-- Runs once, when the compose MariaDB starts on an empty volume.
CREATE USER 'tributary'@'%' IDENTIFIED BY 'tributary';
GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT, RELOAD ON *.* TO 'tributary'@'%';
CREATE TABLE shop.orders (id int PRIMARY KEY, item varchar(100) NOT NULL, qty int NOT NULL);
